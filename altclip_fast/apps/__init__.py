"""What users run: the command line (``classify``, ``embed``, ``bench``), the embedding job and the benchmark."""
