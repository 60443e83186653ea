from pastiche.cli import main

raise SystemExit(main())
