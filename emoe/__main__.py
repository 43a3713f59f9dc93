from emoe.cli import main

raise SystemExit(main())
