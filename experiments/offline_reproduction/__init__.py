"""The Memory Decoder paper's experiments at small scale on the offline corpora: run.py (the recipe),
scheduler.py (jobs, stages, resume), case_study.py and rag_check.py (two checks); the claims are
reports/claims.py's (`memdec report --claims`)."""
