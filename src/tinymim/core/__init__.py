"""The foundation: errors, stop signals, configs and the run directory; imports nothing else of tinymim."""
