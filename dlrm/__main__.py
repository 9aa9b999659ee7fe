from dlrm.cli import main

raise SystemExit(main())
