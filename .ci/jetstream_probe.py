#!/usr/bin/env python3
"""Checks that the NATS server on 127.0.0.1 (port: argv[1], default 4222)
can create and delete a JetStream stream, speaking the NATS protocol
directly (no client library needed). Exit 0 if it can; 1 with the reason.

.ci/run uses it because a server can accept connections and still refuse
every new stream: nats-server 2.9 removes an account's store directory
with its last stream, and a creation racing that removal left the server
answering "could not create storage directory" until it was restarted.
"""
import json, socket, sys, time
def probe(host="127.0.0.1", port=4222, timeout=5.0):
    s = socket.create_connection((host, port), timeout=timeout)
    f = s.makefile("rb")
    info = f.readline()
    if not info.startswith(b"INFO"):
        return "no INFO from the server"
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\nSUB _INBOX.ci 1\r\n')
    def call(subject, body):
        data = json.dumps(body).encode()
        s.sendall(b"PUB %s _INBOX.ci %d\r\n%s\r\n" % (subject.encode(), len(data), data))
        s.sendall(b"PING\r\n")
        while True:
            line = f.readline()
            if not line:
                return {"error": {"description": "connection closed"}}
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG"):
                n = int(line.split()[-1])
                payload = f.read(n + 2)[:-2]
                return json.loads(payload or b"{}")
            elif line.startswith(b"HMSG"):
                parts = line.split()
                hdr, total = int(parts[-2]), int(parts[-1])
                raw = f.read(total + 2)[:-2]
                return {"error": {"description": raw[:hdr].decode(errors="replace").strip()}}
            elif line.startswith(b"-ERR"):
                return {"error": {"description": line.decode().strip()}}
    name = "SPOKE_CI_PROBE"
    r = call("$JS.API.STREAM.CREATE." + name, {"name": name, "subjects": ["spoke.ci.probe"], "storage": "file", "max_msgs": 1})
    if "error" in r:
        return "creating a stream: %s" % r["error"].get("description", r["error"])
    r = call("$JS.API.STREAM.DELETE." + name, {})
    if "error" in r:
        return "deleting a stream: %s" % r["error"].get("description", r["error"])
    return None
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 4222
err = probe(port=PORT)
if err:
    print("JetStream on 127.0.0.1:%d failed %s" % (PORT, err), file=sys.stderr)
    sys.exit(1)
