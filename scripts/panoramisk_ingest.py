"""AMI ingest with panoramisk, every event tracked: the peer of benches/ami_ingest.rs.

Usage: panoramisk_ingest.py HOST PORT USERNAME SECRET EVENTS

Logs in with panoramisk's Manager and registers one handler for every event ("*"). The handler
tracks calls by Linkedid: each call is a dict of its channels (Uniqueid -> the channel's latest
state, updated by every event that names the channel, the Dial* events' destination channel
too); a channel that hangs up leaves its call, and a call is closed when its last channel hangs
up. Prints "ready" once logged in, then, after EVENTS events (or 10 s without one), one line:
"done events=... calls=... closed=... live=...".
"""

import asyncio
import sys

from panoramisk import Manager


def main():
    host, port, username, secret, expected = sys.argv[1:6]
    expected = int(expected)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    calls = {}  # Linkedid -> {Uniqueid: channel state}
    channel_call = {}  # Uniqueid -> Linkedid
    gone = set()  # Uniqueids that hung up
    stats = {"events": 0, "calls": 0, "closed": 0, "counting": False}
    finished = loop.create_future()

    def touch(uniqueid, linkedid, event, prefix=""):
        if not uniqueid or uniqueid in gone:
            return
        linkedid = linkedid or uniqueid
        previous = channel_call.get(uniqueid)
        if previous is not None and previous != linkedid:
            # Moved to another call (a transfer, a Local channel optimised away).
            leave(uniqueid, previous)
        call = calls.get(linkedid)
        if call is None:
            call = calls[linkedid] = {}
            stats["calls"] += 1
        channel_call[uniqueid] = linkedid
        state = call.setdefault(uniqueid, {})
        state["event"] = event.event
        for key in ("Channel", "ChannelState", "CallerIDNum", "ConnectedLineNum", "Context", "Exten"):
            value = event.get(prefix + key)
            if value is not None:
                state[key] = value

    def leave(uniqueid, linkedid):
        call = calls.get(linkedid)
        if call is None:
            return
        call.pop(uniqueid, None)
        if not call:
            del calls[linkedid]
            stats["closed"] += 1

    def on_event(manager, event):
        if not stats["counting"]:
            return
        stats["events"] += 1
        uniqueid = event.get("Uniqueid")
        touch(uniqueid, event.get("Linkedid"), event)
        touch(event.get("DestUniqueid"), event.get("DestLinkedid"), event, "Dest")
        if event.event == "Hangup" and uniqueid and uniqueid not in gone:
            gone.add(uniqueid)
            linkedid = channel_call.pop(uniqueid, None)
            if linkedid is not None:
                leave(uniqueid, linkedid)
        if stats["events"] >= expected and not finished.done():
            finished.set_result(True)

    def on_login(manager):
        # Events before this (FullyBooted) are the session's own, not the stream's.
        stats["counting"] = True
        print("ready", flush=True)

    manager = Manager(
        loop=loop,
        host=host,
        port=int(port),
        username=username,
        secret=secret,
        on_login=on_login,
    )
    manager.register_event("*", on_event)
    manager.connect()

    async def wait():
        seen = -1
        while not finished.done():
            if stats["counting"] and stats["events"] == seen:
                break  # 10 s without an event: something is missing.
            seen = stats["events"] if stats["counting"] else -1
            try:
                await asyncio.wait_for(asyncio.shield(finished), 10)
            except asyncio.TimeoutError:
                pass

    loop.run_until_complete(wait())
    live = len(calls)
    print(
        "done events=%d calls=%d closed=%d live=%d%s"
        % (
            stats["events"],
            stats["calls"],
            stats["closed"],
            live,
            "" if stats["events"] >= expected else " (incomplete: %d expected)" % expected,
        ),
        flush=True,
    )
    manager.close()


if __name__ == "__main__":
    main()
