from dropup.upcycle.cli import main

raise SystemExit(main())
