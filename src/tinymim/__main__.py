from tinymim.cli import main

raise SystemExit(main())
