"""Code both the workers and the trainer use: settings, imaging, models, Grad-CAM, storage, schema."""
