"""The notebooks' side: training with live bars and plots and the tables they show (live), widget panels
(widgets), figures (plots), Colab set-up (colab) and the badges and clone lines that name the repository
(links). It exports nothing itself, so that ``python -m newllm_nb.notebook.colab`` installs what is missing
before anything heavy is imported."""
