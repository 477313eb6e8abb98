"""``python -m moe_kernels`` == the ``moe-kernels`` command."""

from moe_kernels.cli import main

raise SystemExit(main())
