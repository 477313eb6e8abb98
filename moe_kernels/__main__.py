"""``python -m moe_kernels`` == the ``moe-kernels`` command."""

from moe_kernels.tools.cli import main

raise SystemExit(main())
