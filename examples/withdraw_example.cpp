// Calls vtw::withdraw from C++ through the PyTorch dispatcher, the way a libtorch program uses
// the operator library built by CMakeLists.txt (libvtw_ops.so), and checks every result
// against a direct computation written here with plain loops. Exits non-zero on a mismatch.
//
// The program never names a symbol of libvtw_ops.so: loading the library registers the ops
// (static initialisers of TORCH_LIBRARY / TORCH_LIBRARY_IMPL), and they are looked up by name.
// That is why CMakeLists.txt links it through vtw::ops, which keeps it with --no-as-needed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using WithdrawFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, std::optional<c10::SymInt>, bool);

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// The expected result, from the definition in CONTRACT.md: row b keeps the positions s with
// mask[b][s] == false, in increasing order, left- or right-aligned in S_keep slots.
struct Expected {
  at::Tensor out, keep_index, keep_lens;
};

Expected direct_withdraw(const at::Tensor& hidden, const std::vector<std::vector<bool>>& mask,
                         std::optional<int64_t> num_keep, bool pad_left) {
  const int64_t B = hidden.size(0), D = hidden.size(2);
  std::vector<std::vector<int64_t>> kept(B);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (size_t s = 0; s < mask[b].size(); ++s) {
      if (!mask[b][s]) kept[b].push_back(static_cast<int64_t>(s));
    }
    max_len = std::max<int64_t>(max_len, static_cast<int64_t>(kept[b].size()));
  }
  const int64_t s_keep = num_keep.value_or(max_len);
  // Work in float32: every float16/bfloat16 value is exactly representable there.
  const at::Tensor h = hidden.to(at::kFloat);
  auto ha = h.accessor<float, 3>();
  std::vector<float> out(static_cast<size_t>(B * s_keep * D), 0.0f);
  std::vector<int64_t> index(static_cast<size_t>(B * s_keep), -1);
  std::vector<int32_t> lens(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = static_cast<int64_t>(kept[b].size());
    lens[b] = static_cast<int32_t>(n);
    const int64_t first = pad_left ? s_keep - n : 0;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t j = first + r, s = kept[b][r];
      index[b * s_keep + j] = s;
      for (int64_t d = 0; d < D; ++d) out[(b * s_keep + j) * D + d] = ha[b][s][d];
    }
  }
  return {at::tensor(out).reshape({B, s_keep, D}), at::tensor(index).reshape({B, s_keep}),
          at::tensor(lens)};
}

// A small integer tensor as nested lists, e.g. [[0, 4, 5, 6], [0, 1, 6, -1]].
std::string fmt(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  std::ostringstream os;
  if (c.dim() == 0) {
    os << c.item<int64_t>();
  } else {
    os << "[";
    for (int64_t i = 0; i < c.size(0); ++i) os << (i ? ", " : "") << fmt(c[i]);
    os << "]";
  }
  return os.str();
}

std::string fmt(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

}  // namespace

int main() {
  // One typed handle to the operator, found by name; throws if libvtw_ops.so was not loaded.
  if (!c10::Dispatcher::singleton().findSchema({"vtw::withdraw", ""}).has_value()) {
    std::cerr << "vtw::withdraw is not registered: libvtw_ops.so was not loaded. Link it through "
                 "the CMake target vtw::ops (which keeps it with --no-as-needed), or dlopen it.\n";
    return 2;
  }
  auto withdraw = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("vtw::withdraw", "")
                      .typed<WithdrawFn>();
  std::cout << "schema: " << withdraw.schema() << "\n\n";

  // A tiny LLaVA-like batch: B = 2 rows of S = 7 tokens, D = 3. Row 0 has a 3-token image
  // (positions 1..3), row 1 a 4-token image (positions 2..5), so row 1 keeps fewer tokens and
  // its output row is padded.
  const int64_t B = 2, S = 7, D = 3;
  const at::Tensor hidden_f32 = at::arange(B * S * D, at::kFloat).reshape({B, S, D}) * 0.5f - 3.0f;
  const std::vector<std::vector<bool>> mask_rows = {
      {false, true, true, true, false, false, false},
      {false, false, true, true, true, true, false},
  };
  at::Tensor mask = at::zeros({B, S}, at::kBool);
  auto ma = mask.accessor<bool, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) ma[b][s] = mask_rows[b][s];

  std::cout << "hidden [B, S, D] = " << hidden_f32.sizes() << ":\n" << hidden_f32 << "\n";
  std::cout << "visual_mask (1 = withdraw) " << fmt(mask) << "\n";

  struct Case {
    at::ScalarType dtype;
    std::optional<int64_t> num_keep;
    bool pad_left;
  };
  const std::vector<Case> cases = {
      {at::kFloat, std::nullopt, false}, {at::kFloat, 6, true},
      {at::kHalf, std::nullopt, true},   {at::kBFloat16, 5, false},
  };
  for (const Case& c : cases) {
    const at::Tensor hidden = hidden_f32.to(c.dtype);
    std::optional<c10::SymInt> nk;
    if (c.num_keep) nk = c10::SymInt(*c.num_keep);
    auto [out, keep_index, keep_lens] = withdraw.call(hidden, mask, nk, c.pad_left);
    const Expected e = direct_withdraw(hidden, mask_rows, c.num_keep, c.pad_left);

    std::cout << "\n== dtype " << c.dtype << ", num_keep "
              << (c.num_keep ? std::to_string(*c.num_keep) : std::string("None")) << ", pad_left "
              << (c.pad_left ? "true" : "false") << "\n";
    std::cout << "keep_lens  " << fmt(keep_lens) << "\nkeep_index " << fmt(keep_index) << "\n";
    if (c.dtype == at::kFloat && !c.pad_left) std::cout << "out:\n" << out << "\n";
    expect(out.scalar_type() == c.dtype, "out dtype is the dtype of hidden");
    expect(out.sizes() == e.out.sizes(), "out shape " + fmt(out.sizes()));
    expect(keep_index.scalar_type() == at::kLong && keep_index.sizes() == e.keep_index.sizes() &&
               at::equal(keep_index, e.keep_index),
           "keep_index matches the loop (int64, -1 in padding slots)");
    expect(keep_lens.scalar_type() == at::kInt && at::equal(keep_lens, e.keep_lens),
           "keep_lens matches the loop (int32)");
    // Bit-exact: the op is a copy (float16/bfloat16 -> float32 is lossless).
    expect(out.sizes() == e.out.sizes() && at::equal(out.to(at::kFloat), e.out),
           "out equals the loop's copy exactly");
  }

  // An invalid argument is an error that names it, never a truncation.
  try {
    withdraw.call(hidden_f32, mask, c10::SymInt(3), false);
    expect(false, "num_keep = 3 < 4 kept tokens raised no error");
  } catch (const c10::Error& err) {
    const std::string msg = err.what_without_backtrace();
    std::cout << "\nnum_keep = 3 -> error: " << msg.substr(0, msg.find('\n')) << "\n";
    expect(msg.find("num_keep") != std::string::npos, "num_keep below a row's count is an error naming num_keep");
  }

  std::cout << "\n" << (failures == 0 ? "PASS" : "FAIL") << ": " << failures << " failed check(s)\n";
  return failures == 0 ? 0 : 1;
}
