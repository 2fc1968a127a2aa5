"""tether_lab: the research lab built on the tether library — the embedded synthetic world, the knowledge probe,
SmolLM2-135M-Instruct and its instructed personas, the BAPO and BPO studies, the demo and the tiny test models.

It depends on `tether` and never the reverse: it adds its built-in models (`world`, `world-sft`,
`smollm2-135m-instruct`), its `world` oracle, its eval suites (`tether eval --suite world|knowledge`) and its
subcommands (`tether world ...`, `tether study ...`) to tether through entry points (pyproject.toml;
tether.registry)."""
