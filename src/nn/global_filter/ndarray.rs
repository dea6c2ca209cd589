//! [`SpectralBackend`] on NdArray: the tensors' host memory handed to the real-FFT kernels of
//! [`fft_cpu`](super::fft_cpu).

use super::*;

macro_rules! ndarray_spectral {
    ($elem:ty) => {
        impl SpectralBackend for NdArray<$elem> {
            fn global_filter_forward(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                layout: FilterLayout,
            ) -> FloatTensor<Self> {
                let dims = shape4(&x);
                let geom = fft_cpu::Geom::new(dims, layout);
                let xs = host::<$elem>(&x);
                let ws = host::<$elem>(&weight);
                let out = fft_cpu::forward(&xs, &ws, geom, false);
                NdArrayTensor::from_data(TensorData::new(out, dims))
            }

            fn global_filter_backward(
                grad: FloatTensor<Self>,
                x: Option<FloatTensor<Self>>,
                weight: Option<FloatTensor<Self>>,
                layout: FilterLayout,
            ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
                let dims = shape4(&grad);
                let geom = fft_cpu::Geom::new(dims, layout);
                let (_, c, h, w) = layout.ncwh(dims);
                let gs = host::<$elem>(&grad);
                let xs = x.as_ref().map(host::<$elem>);
                let ws = weight.as_ref().map(host::<$elem>);
                let (gx, gw) = fft_cpu::backward(&gs, xs.as_deref(), ws.as_deref(), geom);
                let gx = gx.map(|v| NdArrayTensor::from_data(TensorData::new(v, dims)));
                let gw = gw.map(|v| {
                    NdArrayTensor::from_data(TensorData::new(v, layout.weight_shape(c, h, w)))
                });
                (gx, gw)
            }
        }
    };
}

ndarray_spectral!(f32);
ndarray_spectral!(f64);

fn shape4<T: TensorMetadata>(t: &T) -> [usize; 4] {
    let s = t.shape();
    assert_eq!(
        s.num_dims(),
        4,
        "global filter: expected a rank-4 tensor, got {s:?}"
    );
    [s[0], s[1], s[2], s[3]]
}

/// Element types the host FFT path runs in.
trait HostElem: fft_cpu::Real + burn::tensor::Element {
    /// The row-major data of `t` if it holds this element type: borrowed when contiguous,
    /// otherwise copied into standard layout (ndarray's strided copy; much faster than reading
    /// a shared tensor out through `into_data`).
    fn host_data(t: &NdArrayTensor) -> Option<Cow<'_, [Self]>>;
}

macro_rules! host_elem {
    ($elem:ty, $variant:ident) => {
        impl HostElem for $elem {
            fn host_data(t: &NdArrayTensor) -> Option<Cow<'_, [Self]>> {
                let NdArrayTensor::$variant(s) = t else {
                    return None;
                };
                let v = s.view();
                Some(match v.to_slice() {
                    Some(sl) => Cow::Borrowed(sl),
                    None => {
                        let len = v.len();
                        let (mut data, offset) = v
                            .as_standard_layout()
                            .into_owned()
                            .into_raw_vec_and_offset();
                        data.drain(..offset.unwrap_or(0));
                        data.truncate(len);
                        Cow::Owned(data)
                    }
                })
            }
        }
    };
}

host_elem!(f32, F32);
host_elem!(f64, F64);

/// The row-major host data of `t` in element type `E` (converted when it holds another type).
fn host<E: HostElem>(t: &NdArrayTensor) -> Cow<'_, [E]> {
    if let Some(data) = E::host_data(t) {
        return data;
    }
    let data = Tensor::<NdArray, 4>::from_primitive(TensorPrimitive::Float(t.clone()))
        .into_data()
        .convert::<E>();
    Cow::Owned(
        data.to_vec::<E>()
            .expect("host data of the converted element type"),
    )
}
