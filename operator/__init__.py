"""The kopf operator: reconciles the four kinds into KubeRay RayJobs."""
