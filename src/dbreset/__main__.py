from __future__ import annotations

from dbreset.console import main

main()
