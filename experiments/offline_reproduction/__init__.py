"""The Memory Decoder paper's experiments at small scale on the offline corpora: run.py (the recipe),
scheduler.py (jobs, stages, resume), claims.py (the paper's claims against the numbers)."""
