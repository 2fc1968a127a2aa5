"""The paper studies: each writes results.json (protocol, every run, summary with CIs, claims), report.md and PNGs."""
