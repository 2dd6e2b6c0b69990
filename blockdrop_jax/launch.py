"""Several processes of one run on this machine, as a pod runs one per host:

  python -m blockdrop_jax.launch --processes 2 [--devices_per_process 2] -- \
      train.py --config quickstart:smoke --workdir runs/two

Each process gets the coordinator's address (a free local port), the process count and its id
through the environment (``multihost.ENVIRONMENT``); its output comes back line by line behind
``[id]``. SIGTERM or Ctrl-C here reaches every process (a preemption: each saves the same step and
exits with ``multihost.PREEMPTED_EXIT_CODE``). If one process fails, the others are stopped and
its exit status is this command's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

# How long the other processes may take to end by themselves once one has failed (they usually
# fail the same way) before they are killed: one stuck in a collective would otherwise wait for
# jax's heartbeat timeout.
GRACE_S = 10.0


def _arguments(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m blockdrop_jax.launch", description=__doc__.split("\n\n")[0],
      usage="%(prog)s --processes N [--devices_per_process M] -- PROGRAM.py ARGS")
  parser.add_argument("--processes", type=int, required=True, help="how many processes")
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="CPU devices each process gets (XLA's host device count); 0: as is")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: train.py or evaluate.py (or any program) and its flags")
  args = parser.parse_args(argv)
  args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if args.processes < 1 or args.devices_per_process < 0 or not args.command:
    parser.error("give --processes >= 1, --devices_per_process >= 0 and, after --, the program "
                 "to run")
  return args


def _environment(process_id: int, processes: int, port: int, devices: int) -> dict:
  from blockdrop_jax.multihost import ENVIRONMENT
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.update({ENVIRONMENT["coordinator_address"]: f"localhost:{port}",
              ENVIRONMENT["num_processes"]: str(processes),
              ENVIRONMENT["process_id"]: str(process_id)})
  if devices:
    env["XLA_FLAGS"] = " ".join(
        [flag for flag in env.get("XLA_FLAGS", "").split()
         if not flag.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _forward(process_id: int, stream) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"[{process_id}] {line}")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
  args = _arguments(argv)
  import portpicker
  port = portpicker.pick_unused_port()
  command = ([sys.executable, *args.command] if args.command[0].endswith(".py")
             else args.command)
  processes = [subprocess.Popen(command, env=_environment(i, args.processes, port,
                                                          args.devices_per_process),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(args.processes)]
  forwarders = [threading.Thread(target=_forward, args=(i, p.stdout), daemon=True)
                for i, p in enumerate(processes)]
  for thread in forwarders:
    thread.start()
  preempted = threading.Event()

  def preempt(signum, frame):
    preempted.set()
    for p in processes:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, preempt)
  signal.signal(signal.SIGINT, preempt)
  status, failed_at = 0, None
  while any(p.poll() is None for p in processes):
    failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
    if failed and failed_at is None:
      status, failed_at = failed[0], time.monotonic()
    if failed_at is not None and not preempted.is_set() and time.monotonic() > failed_at + GRACE_S:
      for p in processes:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  for thread in forwarders:
    thread.join()
  if not status:
    status = next((p.returncode for p in processes if p.returncode), 0)
  return status if status >= 0 else 128 - status  # killed by a signal: as a shell reports it


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
