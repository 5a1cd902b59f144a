"""The data side: annotation records, 2D image and 3D volume readers, preprocessing, caching."""
