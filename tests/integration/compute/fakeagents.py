"""Run several host agents with the FakeDriver in one process (test helper, not a test).

    python -m tests.integration.compute.fakeagents --database-url URL --zone ZONE --state-dir DIR \
        NAME:VCPUS:MEMORY_MB:DISK_GB[:GPUS] ...

Used to give hosts registered without an agent (placement tests) an agent for cleanup, and to
exercise the real agent code against a real control plane without booting guests. Prints
"ready" once every agent has registered; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("hosts", nargs="+")
    args = parser.parse_args()
    os.environ["HACKBOOT_DATABASE_URL"] = args.database_url
    logging.basicConfig(level="WARNING")
    from hackboot.compute.agent import Agent, AgentSettings
    from hackboot.compute.fake_driver import FakeDriver, FakeHost

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agents = []
    for spec in args.hosts:
        name, vcpus, mem, disk, *gpus = spec.split(":", 4)
        cfg = AgentSettings(driver="fake", name=name, zone=args.zone, state_dir=args.state_dir / name,
                            vcpus=int(vcpus), memory_mb=int(mem), disk_gb=int(disk), reserved_memory_mb=0,
                            reserved_disk_gb=0, reserved_vcpus=0, gpus=gpus[0] if gpus else "",
                            poll_interval=0.2, heartbeat_interval=1.0, check_interval=2.0)
        agent = Agent(cfg, driver=FakeDriver(FakeHost()), stop_event=stop)
        agent.start()
        agents.append(agent)
    for agent in agents:
        agent.ready.wait(60)
    print("ready", flush=True)
    stop.wait()
    for agent in agents:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
