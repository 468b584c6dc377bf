"""Report text: normalisation, sections and sentences (:mod:`.reports`) and the 18-label abnormality labelers
(:mod:`.labeler`: rule patterns in :mod:`.rules`, negation and uncertainty in :mod:`.negation`)."""
