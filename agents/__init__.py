"""Cluster agents for Docker: one core (DockerContainer, DockerDaemon, the event watcher) and two thin
front ends over it, OCF resource agents for Pacemaker and VCS script agents, that only map results to
exit codes. The core talks to Docker through its API (the docker SDK) and never parses CLI output."""
