from ipfm_fast.cli import main

raise SystemExit(main())
