// The blockrepl command line.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>

#include "blockrepl/batch_codec.h"
#include "tools/cli/mount_command.h"
#include "tools/cli/option_values.h"

int main(int argc, char** argv) {
  using namespace blockrepl;
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
  ReplicaConfig& repl = mount.replica;
  mount_cmd->add_option("--listen", repl.listen_address, "serve slaves on ADDR:PORT");
  mount_cmd->add_option("--master", repl.master_address, "be a read-only replica of the master at HOST:PORT");
  const std::map<std::string, AckLevel> ack_levels = {
      {"async", AckLevel::async}, {"recv", AckLevel::recv}, {"sync", AckLevel::sync}};
  mount_cmd->add_option("--ack", repl.ack, "when barriers return: async, recv or sync (default sync)")
      ->transform(CLI::Transformer(ack_levels))
      // CLI11 runs the transform added last first: refuse a bad name ("--ack: x not in {...}")
      // before the names are turned into values.
      ->transform(CLI::IsMember({"async", "recv", "sync"}));
  mount_cmd
      ->add_option_function<int64_t>(
          "--ack-timeout", [&repl](const int64_t& ms) { repl.ack_timeout = std::chrono::milliseconds(ms); },
          "drop a slave that does not answer for this long (default 5s)")
      ->transform(positive_duration_ms());
  mount_cmd->add_option("--min-sync-slaves", repl.min_sync_slaves, "barriers fail with EIO unless this many sync slaves confirm");
  mount_cmd->add_option("--journal-size", repl.journal_bytes, "recent records kept for re-attaching slaves (default 256M; 0 keeps none)")
      ->transform(byte_size());
  mount_cmd->add_option("--fd-budget", repl.fd_budget,
                        "descriptors the daemon keeps open for files, whatever their number (default 1024)")
      ->check(CLI::Range(16, 1 << 20));
  uint32_t block_size = 0;
  auto* block_size_opt =
      mount_cmd->add_option("--block-size", block_size, "hash block size, fixed when the volume is created (default 4096)")
          ->check(hash_block_size());
  mount_cmd->add_flag("--no-fsync", repl.no_fsync, "slave: do not fsync applied records (faster, not durable)");
  mount_cmd->add_flag("--exit-on-disconnect", repl.exit_on_disconnect, "slave: exit non-zero when the master is lost");
  mount_cmd->add_flag("--discard-my-data", repl.discard_my_data,
                      "slave: its data directory may be replaced: a diverged node (a former master) rejoins and is "
                      "rewritten to its master's state, a directory holding other files is emptied for the first copy");

  // Parsed twice: the validator refuses a bad value with one line, the function keeps it.
  auto keep_compression = [](Compression* into) {
    return [into](const std::string& v) {
      std::string why;
      *into = parse_compression(v, &why).value_or(Compression{});
    };
  };
  mount_cmd
      ->add_option_function<std::string>("--compress", keep_compression(&repl.compress),
                                         "compress the record stream with zstd (level 1-19, default 3): a master for its "
                                         "slaves, a slave asks its master (for slow links; off by default)")
      ->check(compression());
  add_security_options(mount_cmd, mount.security, true);
  mount_cmd->add_flag("--trace", mount.trace,
                      "keep latency histograms of each stage of a barrier (status --json shows them under \"trace\")");

  std::string umount_point;
  bool lazy = false;
  auto* umount_cmd = app.add_subcommand("umount", "unmount MOUNTPOINT and wait for its daemon to finish");
  umount_cmd->add_option("mountpoint", umount_point, "the mount point")->required();
  umount_cmd->add_flag("-z,--lazy", lazy, "detach now even if busy");

  std::string status_point;
  bool status_json = false;
  auto* status_cmd = app.add_subcommand("status", "show role, LSNs, peers and lag of the daemon behind MOUNTPOINT");
  status_cmd->add_option("mountpoint", status_point, "the mount point")->required();
  status_cmd->add_flag("--json", status_json, "one JSON object");

  std::string pull_address, pull_dir;
  int pull_verbose = 0;
  bool pull_quiet = false;
  auto* pull_cmd = app.add_subcommand("pull", "update the unmounted DIR to a consistent state of the master at HOST:PORT; exit 0 iff complete");
  pull_cmd->add_option("address", pull_address, "the master, HOST:PORT")->required();
  pull_cmd->add_option("dir", pull_dir, "the directory to update (a cold standby or backup)")->required();
  pull_cmd->add_flag("-v,--verbose", pull_verbose, "log what happens (-vv for debug)");
  pull_cmd->add_flag("-q,--quiet", pull_quiet, "print nothing unless something is wrong (for cron)");
  bool pull_discard = false;
  pull_cmd->add_flag("--discard-my-data", pull_discard,
                     "DIR may be replaced: files that are not a blockrepl volume, or a diverged volume (a former master)");
  Compression pull_compress;
  pull_cmd
      ->add_option_function<std::string>("--compress", keep_compression(&pull_compress),
                                         "ask the master to compress the records it streams with zstd (level 1-19, default 3)")
      ->check(compression());
  SecurityOptions pull_security;
  add_security_options(pull_cmd, pull_security, false);

  std::string promote_point;
  auto* promote_cmd = app.add_subcommand("promote", "turn the slave behind MOUNTPOINT into a master (failover)");
  promote_cmd->add_option("mountpoint", promote_point, "the slave's mount point")->required();

  std::string verify_point;
  bool verify_deep = false;
  auto* verify_cmd = app.add_subcommand(
      "verify", "slave: compare its hash trees with its master's (with the daemon's secret and TLS); exit 0 iff identical");
  verify_cmd->add_option("mountpoint", verify_point, "the slave's mount point")->required();
  verify_cmd->add_flag("--deep", verify_deep, "rehash the data on both sides first (finds bit rot)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::RequiredError& e) {
    // An unknown flag is the likelier mistake than the missing option it displaced.
    for (auto* sub : app.get_subcommands({}))
      for (const auto& extra : sub->remaining())
        if (!extra.empty() && extra[0] == '-') {
          fprintf(stderr, "blockrepl: %s: unknown option %s (see blockrepl %s --help)\n", sub->get_name().c_str(),
                  extra.c_str(), sub->get_name().c_str());
          return 2;
        }
    // CLI11 reports an unknown subcommand as a missing one; name what was given instead.
    if (argc > 1 && argv[1][0] != '-' && !app.get_subcommands().size()) {
      fprintf(stderr, "blockrepl: unknown command '%s' (commands: mount, umount, status, verify, promote, pull; see blockrepl --help)\n", argv[1]);
      return 2;
    }
    fprintf(stderr, "blockrepl: %s (see blockrepl --help)\n", e.what());
    return 2;
  } catch (const CLI::ParseError& e) {
    // One line, not the whole help text.
    fprintf(stderr, "blockrepl: %s (see blockrepl --help)\n", e.what());
    return 2;
  }
  if (*mount_cmd) {
    // Not given means the volume's own.
    if (block_size_opt->count() > 0) repl.block_size = block_size;
    return run_mount(mount);
  }
  if (*umount_cmd) return run_umount(umount_point, lazy);
  if (*status_cmd) return run_status(status_point, status_json);
  if (*verify_cmd) return run_verify(verify_point, verify_deep);
  if (*promote_cmd) return run_promote(promote_point);
  if (*pull_cmd) return run_pull(pull_address, pull_dir, pull_quiet ? -1 : pull_verbose, pull_discard, pull_security, pull_compress);
  return 2;
}
