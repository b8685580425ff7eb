from __future__ import annotations

from dbreset.main import main

main()
