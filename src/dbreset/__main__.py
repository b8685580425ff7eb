from __future__ import annotations

from dbreset.cli import main

main()
