// NoOp: does nothing per batch; a path of these measures the framework's own cost per event.
#include "framework/registry.hpp"

namespace {
class NoOp : public fw::Module {
 public:
  Collections makes() const override { return Names{}; }
  Collections needs() const override { return Names{}; }
};
}  // namespace

ECLRECO_REGISTER_MODULE(NoOp, "NoOp", "does nothing (framework overhead measurements)")
