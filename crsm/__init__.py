"""The `crsm` command and what joins the two packages below it: `crsm_core` (models, engine, planner;
no HTTP) and `server` (the HTTP server around the engine). Neither of them imports this package, and
`crsm_core` never imports `server` (tests/test_cli.py checks both)."""
