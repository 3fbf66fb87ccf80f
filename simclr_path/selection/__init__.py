"""Active learning: which regions of the stored slides a pathologist should annotate next."""
