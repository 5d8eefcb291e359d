from p2pvpn.cli import main

raise SystemExit(main())
