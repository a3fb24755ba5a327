"""Linear probes: data sets, decoded images, feature extraction, classifiers."""
