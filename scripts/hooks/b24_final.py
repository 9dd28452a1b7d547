#!/usr/bin/env python3
"""process_final_params (Bitrix24): a call answered for only a few seconds counts as missed.

Argument: the shortest talk, in seconds, that counts as a conversation. An answered call
(`STATUS_CODE` "200") whose `DURATION` is shorter is finished as missed: `STATUS_CODE` "304"
and `DURATION` 0, so it shows as missed in the portal's statistics and the manager gets no
credit for a call that was hung up at once. Other calls keep what pbxgate chose. Configure it
as:

    [hooks.process_final_params]
    command = ["python3", "/etc/pbxgate/hooks/b24_final.py", "5"]
"""
import json
import sys

if len(sys.argv) != 2 or not sys.argv[1].isdigit():
    sys.exit("usage: b24_final.py MIN_SECONDS")
shortest = int(sys.argv[1])

params = json.load(sys.stdin)
data = {}
duration = params.get("DURATION")
if params.get("STATUS_CODE") == "200" and isinstance(duration, int) and duration < shortest:
    data = {"STATUS_CODE": "304", "DURATION": 0}
print(json.dumps({"state": "success", "data": data}))
