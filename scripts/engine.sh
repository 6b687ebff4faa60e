# Sourced by scripts/run and scripts/test: the machine's own Docker engine (default settings, default
# socket /var/run/docker.sock, bridge docker0), started if none answers and left running; wait until
# it answers, or fail with the end of its log.
start_engine() {
  docker version >/dev/null 2>&1 && return 0
  echo "starting dockerd (log: /var/log/dockerd.log)"
  setsid dockerd >>/var/log/dockerd.log 2>&1 < /dev/null &
  local pid=$! i
  for i in $(seq 1 300); do
    docker version >/dev/null 2>&1 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "dockerd exited:" >&2; tail -n 20 /var/log/dockerd.log >&2; return 1
    fi
    sleep 0.2
  done
  echo "dockerd did not answer within 60 s:" >&2; tail -n 20 /var/log/dockerd.log >&2; return 1
}
