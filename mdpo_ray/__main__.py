from mdpo_ray.cli import main

raise SystemExit(main())
