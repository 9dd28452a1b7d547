#!/usr/bin/env python3
"""customize_autodistribution: callers from a list of VIP numbers go to one extension.

Arguments: the list file, the extension, and optionally a caller-id name (at most 20
characters) for the extension's phone. The file has one number per line in any format;
blank lines and text after `#` are ignored. It is read on every call, so edits apply at once.
A number matches the caller when their digits are equal, or when both have at least 10
digits and the last 10 are equal (+7 916 123-45-67 matches 89161234567). Other callers keep
what routing chose. A missing or unreadable file makes the hook fail: routing's answer stands.
Configure it as:

    [hooks.customize_autodistribution]
    command = ["python3", "/etc/pbxgate/hooks/vip_route.py", "/etc/pbxgate/vip.txt", "105", "VIP"]
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


if len(sys.argv) not in (3, 4):
    sys.exit("usage: vip_route.py LIST_FILE EXTENSION [NAME]")
list_file, extension = sys.argv[1], sys.argv[2]
name = sys.argv[3] if len(sys.argv) == 4 else None

call = json.load(sys.stdin)
caller = digits(call.get("from") or "")
with open(list_file, encoding="utf-8") as f:
    vip = [digits(line.split("#", 1)[0]) for line in f]

data = {}
if any(same(caller, number) for number in vip):
    data["number"] = extension
    if name:
        data["name"] = name
print(json.dumps({"state": "success", "data": data}))
