# The plugins this template needs; `packer init packer/` installs them.
# Kept in a file of its own so .ci/packer-check.sh can validate the rest with
# Debian's packer 1.6.6, which predates required_plugins (and has the amazon
# builder built in).
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}
