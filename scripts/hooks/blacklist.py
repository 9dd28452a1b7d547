#!/usr/bin/env python3
"""need_registration: calls over some trunks, or from some numbers, never reach the CRM.

The trunks and numbers are given as arguments; a trunk matches the channel's technology and
name (`PJSIP/trunk`), a number matches any form of the customer's number pbxgate knows (as
the PBX gave it, national, canonical). Configure it as:

    [hooks.need_registration]
    command = ["python3", "/etc/pbxgate/hooks/blacklist.py",
               "--trunk", "PJSIP/test-trunk", "--number", "+74951234567"]

A call the hook refuses shows no pop-up and sends no history; pbxgate still keeps it in its
recent calls, marked ignored.
"""
import argparse
import json
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--trunk", action="append", default=[])
parser.add_argument("--number", action="append", default=[])
args = parser.parse_args()

call = json.load(sys.stdin)
channel = (call.get("call_full") or {}).get("channel") or {}
trunk = (channel.get("trunk") or {}).get("original") or ""
# The customer: the caller of an incoming call, the one called on an outgoing one.
side = "to" if channel.get("type") == "outgoing" else "from"
number = channel.get(side) or {}
forms = {number.get("original"), number.get("base"), number.get("custom")}
forms.update(number.get("variants") or [])
forms.discard(None)

blocked = trunk in args.trunk or bool(forms & set(args.number))
data = {"result": False} if blocked else {}
print(json.dumps({"state": "success", "data": data}))
