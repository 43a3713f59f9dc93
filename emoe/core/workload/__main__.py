"""``python -m emoe.core.workload [--out PATH]``: regenerate the built-in default trace."""

from emoe.core.workload.default_trace import main

main()
