from sparsekernels.cli import main

raise SystemExit(main())
