"""Pure decision logic: signals -> state -> continue/stop. No I/O; numpy and the stdlib only."""
