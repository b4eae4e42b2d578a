// Minimal .npy reader/writer; format spec:
// https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
#include "npy.h"

#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace vitq::npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// Returns the text after `'key':` (leading spaces skipped), or npos.
size_t find_value(const std::string& header, const std::string& key) {
  const size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) return std::string::npos;
  size_t p = header.find(':', k);
  if (p == std::string::npos) return std::string::npos;
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  return p;
}

struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

Header parse_header(const std::string& path, const std::string& h) {
  Header out;
  size_t p = find_value(h, "descr");
  if (p == std::string::npos || p >= h.size() || h[p] != '\'')
    fail(path, "bad .npy header (no 'descr')");
  const size_t q = h.find('\'', p + 1);
  if (q == std::string::npos) fail(path, "bad .npy header ('descr')");
  out.descr = h.substr(p + 1, q - p - 1);

  p = find_value(h, "fortran_order");
  if (p == std::string::npos) fail(path, "bad .npy header (no 'fortran_order')");
  out.fortran_order = h.compare(p, 4, "True") == 0;

  p = find_value(h, "shape");
  if (p == std::string::npos || p >= h.size() || h[p] != '(')
    fail(path, "bad .npy header (no 'shape')");
  const size_t close = h.find(')', p);
  if (close == std::string::npos) fail(path, "bad .npy header ('shape')");
  std::string dims = h.substr(p + 1, close - p - 1);
  std::stringstream ss(dims);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t b = item.find_first_not_of(" \t");
    if (b == std::string::npos) continue;  // trailing comma: "(5,)"
    const size_t e = item.find_last_not_of(" \tL");
    const std::string num = item.substr(b, e - b + 1);
    char* end = nullptr;
    const long long v = std::strtoll(num.c_str(), &end, 10);
    if (end == num.c_str() || *end != '\0' || v < 0)
      fail(path, "bad .npy header (shape entry '" + num + "')");
    out.shape.push_back(static_cast<int64_t>(v));
  }
  return out;
}

// Opens `path`, parses and validates the header (float32, C order), and
// leaves `f` positioned at the first data byte. Returns shape and count.
Header open_float32(const std::string& path, std::ifstream& f,
                           size_t* count_out) {
  f.open(path, std::ios::binary);
  if (!f) fail(path, "cannot open input file");

  char pre[10];
  if (!f.read(pre, 8) || std::memcmp(pre, kMagic, kMagicLen) != 0)
    fail(path, "not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(pre[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) fail(path, "truncated .npy header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) fail(path, "truncated .npy header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    fail(path, "unsupported .npy version " + std::to_string(major));
  }
  if (header_len > (1u << 20)) fail(path, "bad .npy header length");
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) fail(path, "truncated .npy header");

  const Header h = parse_header(path, header);
  if (h.descr != "<f4") {
    fail(path, "expected float32 data ('<f4'), got '" + h.descr +
                   "' (save with arr.astype(np.float32))");
  }
  size_t count = 1;
  for (int64_t d : h.shape) {
    if (d != 0 && count > std::numeric_limits<size_t>::max() / 4 / d)
      fail(path, "array too large");
    count *= static_cast<size_t>(d);
  }
  if (h.fortran_order && h.shape.size() > 1)
    fail(path, "Fortran-ordered arrays are not supported (use np.ascontiguousarray)");
  *count_out = count;
  return h;
}

}  // namespace

std::vector<int64_t> read_float32_shape(const std::string& path) {
  std::ifstream f;
  size_t count = 0;
  const Header h = open_float32(path, f, &count);
  // Check the file size too, so truncation is caught before any run.
  const std::streampos data_start = f.tellg();
  f.seekg(0, std::ios::end);
  const std::streamoff data_bytes = f.tellg() - data_start;
  if (data_bytes != static_cast<std::streamoff>(count * sizeof(float)))
    fail(path, "data size does not match the header shape (" +
                   std::to_string(data_bytes) + " bytes for " +
                   std::to_string(count) + " float32 values)");
  return h.shape;
}

Array read_float32(const std::string& path) {
  std::ifstream f;
  size_t count = 0;
  const Header h = open_float32(path, f, &count);
  Array out;
  out.shape = h.shape;
  out.data.resize(count);
  if (count > 0 &&
      !f.read(reinterpret_cast<char*>(out.data.data()), count * sizeof(float)))
    fail(path, "truncated data: header promises " + std::to_string(count) +
                   " float32 values");
  f.peek();
  if (!f.eof()) fail(path, "trailing bytes after the array data");
  return out;
}

void write(const std::string& path, const std::string& descr,
           const std::vector<int64_t>& shape, const void* data,
           size_t nbytes) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) dict += ",";
    if (i + 1 < shape.size()) dict += " ";
  }
  dict += "), }";
  // Version 1.0: magic(6) + version(2) + uint16 length, header padded with
  // spaces and ended by '\n' so the data starts 64-byte aligned.
  const size_t unpadded = kMagicLen + 2 + 2 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error(path + ": cannot open output file for writing");
  f.write(kMagic, kMagicLen);
  const char version[2] = {1, 0};
  f.write(version, 2);
  const unsigned char len[2] = {static_cast<unsigned char>(dict.size() & 0xff),
                                static_cast<unsigned char>(dict.size() >> 8)};
  f.write(reinterpret_cast<const char*>(len), 2);
  f.write(dict.data(), dict.size());
  if (nbytes > 0) f.write(static_cast<const char*>(data), nbytes);
  if (!f) throw std::runtime_error(path + ": write failed");
}

}  // namespace vitq::npy
