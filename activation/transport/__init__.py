"""How tasks travel between hosts: the shared spool folder, Redis pub/sub wake-ups."""
