"""`python -m pipeline ...`: the same command as `pipeline ...`."""
from cli import main

main()
