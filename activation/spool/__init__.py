"""The spool contract: layout, atomic files, the task format, claims, the dead letter, audit."""
