// The blockrepl command line.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "tools/cli/mount_command.h"

int main(int argc, char** argv) {
  using namespace blockrepl::cli;
  CLI::App app{"blockrepl: a FUSE file system that replicates writes"};
  app.require_subcommand(1);

  MountOptions mount;
  auto* mount_cmd = app.add_subcommand("mount", "mount DATA at MOUNTPOINT (daemonizes unless -f)");
  mount_cmd->add_option("--data", mount.data, "backing directory that holds the volume")->required();
  mount_cmd->add_option("mountpoint", mount.mountpoint, "where to mount it")->required();
  mount_cmd->add_flag("-f,--foreground", mount.foreground, "stay in the foreground (as systemd runs it)");
  mount_cmd->add_flag("-v,--verbose", mount.verbose, "more log lines on stderr (-vv for debug)");
  mount_cmd->add_flag("--fuse-debug", mount.fuse_debug, "trace every FUSE request (very verbose)");
  mount_cmd->add_option("--log-file", mount.log_file, "where the background daemon writes its log (default: nowhere)");

  std::string umount_point;
  bool lazy = false;
  auto* umount_cmd = app.add_subcommand("umount", "unmount MOUNTPOINT and wait for its daemon to finish");
  umount_cmd->add_option("mountpoint", umount_point, "the mount point")->required();
  umount_cmd->add_flag("-z,--lazy", lazy, "detach now even if busy");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // One line, not the whole help text.
    fprintf(stderr, "blockrepl: %s (see blockrepl --help)\n", e.what());
    return 2;
  }
  if (*mount_cmd) return run_mount(mount);
  if (*umount_cmd) return run_umount(umount_point, lazy);
  return 2;
}
