#!/usr/bin/env python3
"""One broker identity per pile: mosquitto users, ACL and configuration (docs/cloud-broker.md).

    python tools/broker_users.py pile PILE_ID [--dir DIR] [--host HOST] [--port 8883]
    python tools/broker_users.py cloud NAME [--dir DIR]
    python tools/broker_users.py conf [--dir DIR] [--pile-port 8883] [--pile-bind 0.0.0.0]
        [--pile-cert C --pile-key K] [--cloud-port 8884] [--cloud-bind 10.0.0.1]
        [--cloud-cert C --cloud-key K] [--persistence /var/lib/mosquitto/]

The code: pilehost/broker_users.py.
"""
import sys

from pilehost.broker_users import main

if __name__ == "__main__":
    sys.exit(main())
