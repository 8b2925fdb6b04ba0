"""Deployment: build contexts for container images, local base images, load-balancer configs.

Everything here drives real tools (``buildah``, ``podman``, ``debootstrap``, ``nginx``) and
is imported only by the commands and lessons that need it.
"""

from torchship.deploy._tools import free_port
from torchship.deploy.package import PackageInfo, write_package
from torchship.deploy.requirements import pinned_requirements

__all__ = ["PackageInfo", "free_port", "pinned_requirements", "write_package"]
