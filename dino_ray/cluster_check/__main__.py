"""Lets ``python -m dino_ray.cluster_check cluster/`` run the CLI."""

import sys

from .cli import main

sys.exit(main())
