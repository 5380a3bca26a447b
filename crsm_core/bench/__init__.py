"""`crsm bench`: serving speed of the engine, against mamba_ssm's and transformers' own generate loops,
with and without planners, and end to end over HTTP.

One module per concept: `settings` (what to run), `workload` (model, prompts, tokenizer), `stats`
(latency summaries), `results` (typed results, JSON), `engine_bench`, `baselines`,
`deliberation_bench`, `http_bench` (the sections), `targets`, `report` (markdown, PNG, stdout table),
`runner` (sections in order, each guarded) and `cli` (the subcommand).
"""
