#!/usr/bin/env python3
"""process_contact_creation_params (Kommo): the contact made for an unknown caller gets a
readable name, and the manager of the line the customer called.

Arguments: the name's template, then any number of LINE=USER_ID. In the template `{phone}` is
the caller's number (as the contact's PHONE value holds it) and `{line}` the number the
customer called (empty when the PBX did not say). LINE=USER_ID gives the contacts of calls to
LINE to the Kommo user USER_ID; lines are compared by their digits (the last 10 when both have
that many, so +7 495 123-45-67 matches 84951234567). Calls to other lines keep the manager
pbxgate chose. Configure it as:

    [hooks.process_contact_creation_params]
    command = ["python3", "/etc/pbxgate/hooks/kommo_contact_name.py",
               "Caller {phone} ({line})", "+74951234567=8320150"]
"""
import json
import sys


def digits(text):
    return "".join(c for c in text if c.isdigit())


def same(a, b):
    if not a or not b:
        return False
    if a == b:
        return True
    return len(a) >= 10 and len(b) >= 10 and a[-10:] == b[-10:]


def usage():
    sys.exit("usage: kommo_contact_name.py TEMPLATE [LINE=USER_ID ...]")


if len(sys.argv) < 2:
    usage()
template = sys.argv[1]
lines = []
for arg in sys.argv[2:]:
    line, _, user = arg.partition("=")
    if not digits(line) or not user.isdigit() or int(user) <= 0:
        usage()
    lines.append((digits(line), int(user)))

params = json.load(sys.stdin)
phone = ""
for field in params.get("custom_fields_values") or []:
    if field.get("field_code") == "PHONE" and field.get("values"):
        phone = str(field["values"][0].get("value") or "")
        break
channel = (params.get("call_full") or {}).get("channel") or {}
called = (channel.get("to") or {}).get("original") or ""

data = {}
name = template.replace("{phone}", phone).replace("{line}", called).strip()
if name:
    data["name"] = name[:250]
for line, user in lines:
    if same(line, digits(called)):
        data["responsible_user_id"] = user
        break
print(json.dumps({"state": "success", "data": data}))
