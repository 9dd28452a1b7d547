#!/usr/bin/env python3
"""process_call_params: numbers in international form before they reach the CRM.

A national number with a trunk prefix (8XXXXXXXXXX, as Russian carriers often deliver it)
becomes +7XXXXXXXXXX; a bare 10-digit number gets +7 in front. Anything else is left alone.
Configure it as:

    [hooks.process_call_params]
    command = ["python3", "/etc/pbxgate/hooks/phone_format.py"]
"""
import json
import sys

call = json.load(sys.stdin)
phone = call.get("phone") or ""
digits = "".join(c for c in phone if c.isdigit())
data = {}
if len(digits) == 11 and digits.startswith("8"):
    data["phone"] = "+7" + digits[1:]
elif len(digits) == 10 and not phone.startswith("+"):
    data["phone"] = "+7" + digits
print(json.dumps({"state": "success", "data": data}))
