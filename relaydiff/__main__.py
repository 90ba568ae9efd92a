from relaydiff.cli import main

raise SystemExit(main())
